"""What loratune may write where, and the record of what it wrote.

- ``guard``: the one guard every writing command goes through (paths resolved, aliasing refused, lock taken,
  what is there checked, free space) — ``guard_output``.
- ``manifest``: the record of every file written (``.loratune-output.json``), which ``--overwrite`` trusts.
- ``lock``: one process per output (an OS lock that dies with its process).
- ``write``: atomic writes that keep the record current.
- ``paths``: resolution, aliasing, places never written.
"""

from loratune.outputs.guard import (
    being_written,
    check_free_space,
    check_only_ours,
    check_output_dir,
    check_output_file,
    guard_output,
    is_nonempty_dir,
    written_by_loratune,
)
from loratune.outputs.lock import OutputInUse
from loratune.outputs.manifest import (
    MANIFEST_NAME,
    Manifest,
    open_record,
    record_published,
    record_removed,
    start_log,
)
from loratune.outputs.paths import check_location, refuse_aliasing, resolved
from loratune.outputs.write import publish_dir, remove_written, write_atomic, write_output_dir, write_text_atomic

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "OutputInUse",
    "being_written",
    "check_free_space",
    "check_location",
    "check_only_ours",
    "check_output_dir",
    "check_output_file",
    "guard_output",
    "is_nonempty_dir",
    "open_record",
    "publish_dir",
    "record_published",
    "record_removed",
    "refuse_aliasing",
    "remove_written",
    "resolved",
    "start_log",
    "write_atomic",
    "write_output_dir",
    "write_text_atomic",
    "written_by_loratune",
]
