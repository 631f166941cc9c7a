"""Files the server writes where others may write too (the ready file).

The content goes to a temporary file with an unpredictable name, created
exclusively (`O_EXCL | O_NOFOLLOW`, mode 0600) in the target's directory,
then renamed over the target: a symlink planted at a guessable temporary
name, or at the target itself, can never redirect the write to someone
else's file, and a reader never sees half a file.
"""
import os
import tempfile


def write_atomically(path: str, text: str) -> None:
    """Replace `path` with `text` (see the module docstring)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
