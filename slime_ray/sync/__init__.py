"""Weight transfer trainer -> engines: transports behind one call (see :mod:`.weight_sync`)."""

from slime_ray.sync.transport import TRANSPORTS, choose_transport

__all__ = ["TRANSPORTS", "choose_transport"]
