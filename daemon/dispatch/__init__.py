"""The dispatcher and its parts: waking for reasons, claiming within the limits, recording, the stop policy."""

from daemon.dispatch.dispatcher import Dispatcher
from daemon.dispatch.wakes import Wake, Wakes

__all__ = ["Dispatcher", "Wake", "Wakes"]
