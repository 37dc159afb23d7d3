"""WireTAP Server: SocketCAN interfaces bridged to GVRET TCP clients and PostgreSQL.

Data flows one way: ``sources`` (SocketCAN, replay) -> ``broker`` -> consumers (``server`` for
GVRET clients, ``console`` echo, ``pg`` writer). ``app`` wires them; ``cli`` is the entry point.
"""

__version__ = "1.0.0"
