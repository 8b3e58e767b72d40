"""Floor 1 of cbdnet (beside :mod:`cbdnet.errors`): how every file is read and written.

- :mod:`.outputs`: the one output policy (:class:`OutputSet`): outputs checked before any work, never an
  input, never a symlink/device/FIFO, an existing file only with ``force``, exclusive creation, staged in
  temporary files and published together, temporary files removed on signals. :func:`output_set` is the one
  call a command makes.
- :mod:`.inputs`: inputs opened only after checking they are regular files, with size bounds
  (:func:`read_regular_file`), image folders without symlink loops (:func:`walk_files`), bounded image sizes
  (:func:`open_image_bounded`), ``.npz`` data sets with bounded inflation (:mod:`.npz`, :func:`read_npz`), and
  :func:`escape_name` / :func:`json_safe` for what is printed.
"""

from .inputs import (
                     InputError,
                     check_image_size,
                     check_regular_file,
                     escape_name,
                     json_safe,
                     open_image_bounded,
                     parse_positive_int,
                     read_regular_file,
                     walk_files,
)
from .npz import NpzFormatError, read_npz
from .outputs import OutputError, OutputSet, file_kind, is_stdout

__all__ = ["InputError", "NpzFormatError", "OutputError", "OutputSet", "check_image_size", "check_regular_file",
           "escape_name", "file_kind", "is_stdout", "json_safe", "open_image_bounded", "parse_positive_int", "read_npz",
           "read_regular_file", "walk_files"]
