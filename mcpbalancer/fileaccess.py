"""Why this process may not read a file, said so that the reader can fix it.

A container runs the proxy as a user of its own (uid 10001 in the image) while the mounted
configuration belongs to someone on the host, often with mode 0600 because it holds
`session_binding_key`. "Permission denied" alone does not say who is asking, nor who owns the file.
"""

from __future__ import annotations

import os
import stat


def unreadable(path: str) -> str:
    """What stops this process (its effective uid) from reading `path`, and how to let it."""
    uid, gid = os.geteuid(), os.getegid()
    who = f"uid {uid} (gid {gid})"
    try:
        info = os.stat(path)
    except OSError:
        return (
            f"not readable by {who}: a directory on the path cannot be searched by that user; "
            f"let it in (chmod o+x on the directories), or mount the file itself"
        )
    mode = stat.S_IMODE(info.st_mode)
    return (
        f"not readable by {who}: the file belongs to uid {info.st_uid} (gid {info.st_gid}) with mode "
        f"{mode:04o}. Let that user read it: `chown {uid} <file>` (keep mode 0600 if it holds "
        f"session_binding_key) or, if it holds no secret, `chmod 0644 <file>`. In a container, do "
        f"this to the host file that is mounted, or run the container as the file's owner (--user)"
    )
