"""The engine and its sessions: resident KV sessions with append / generate / truncate / fork /
save / load (`engine`, `session`, `session_io`), sampling, and the processes of a tensor-parallel
engine (`launch`, `spmd`). Builds on loading/."""
