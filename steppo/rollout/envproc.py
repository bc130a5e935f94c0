"""Entry point of one environment process (``rollout.env_workers=process``)::

    python -m steppo.rollout.envproc <fd> <parent pid>

Started by `steppo.rollout.workers.ProcessEnvWorker` as a fresh interpreter, not a
multiprocessing child, so it imports only what the environment needs: this module, the
pickled factory's modules (`steppo.envs.registry` and the environment's own), never torch or
transformers unless the environment imports them (a pure-Python environment's process holds
about 20 MB instead of about 260 MB; see tests/rollout/test_env_workers.py).

Protocol on the socket `fd` (`multiprocessing.connection` framing): the parent sends its
``sys.path``, then the pickled factory; the child builds the environment and answers
``("ready", None)`` or ``("failed", message)``; then each ``(method, args)`` is answered with
``("ok", result)`` or ``("error", message)``; ``None`` or EOF stops it.

The child exits when the parent dies, even in the middle of a long step: a watchdog thread
polls the parent pid (reparenting changes it), and the socket reaches EOF.

No ``__main__`` guard is needed in the trainer's script: the child never imports ``__main__``
(it is a fresh interpreter, not a multiprocessing spawn). An environment module that starts
training when imported (``env=my_script:MyEnv`` for an unguarded script) fails fast instead of
starting processes without end: while the child builds its environment it sets
``STEPPO_BUILDING_ENV``, and `steppo.envs.registry.env_factory` / `ProcessEnvWorker` refuse to
start there, with the fix in the message.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

PARENT_POLL_S = 0.25
BUILDING_ENV = "STEPPO_BUILDING_ENV"  # = steppo.envs.registry.BUILDING_ENV (not imported: this module stays light)


def _watch_parent(ppid: int) -> None:
    while True:
        if os.getppid() != ppid:
            os._exit(1)  # the parent died (kill -9 included): nothing is left to serve
        time.sleep(PARENT_POLL_S)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"


def serve(fd: int, ppid: int) -> None:
    from multiprocessing.connection import Connection

    if os.getppid() != ppid:
        return
    threading.Thread(target=_watch_parent, args=(ppid,), name="parent-watch", daemon=True).start()
    conn = Connection(fd)
    env = None
    try:
        path = conn.recv()
        sys.path[:0] = [p for p in path if p not in sys.path]
        factory = conn.recv()  # imports the environment's modules
        os.environ[BUILDING_ENV] = str(getattr(factory, "name", factory))  # a run started from here fails fast
        try:
            env = factory()
        finally:
            os.environ.pop(BUILDING_ENV, None)
    except (EOFError, OSError):
        return
    except BaseException as exc:  # noqa: BLE001 - reported to the parent: every call fails with it
        conn.send(("failed", _error(exc)))
        return
    conn.send(("ready", None))  # start-up is over: calls from now on are the environment's time
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        method, args = msg
        try:
            reply = ("ok", getattr(env, method)(*args))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the episode's
            reply = ("error", _error(exc))
        try:
            conn.send(reply)
        except (EOFError, OSError, BrokenPipeError):
            break
        except Exception as exc:  # noqa: BLE001 - a result that does not pickle
            conn.send(("error", f"the result of env.{method} could not be sent to the trainer: {_error(exc)}"))
    try:
        env.close()
    except Exception:  # noqa: BLE001 - closing a broken environment must not raise
        pass


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
