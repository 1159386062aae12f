"""What the client and the worker share, and run on both sides: the protocol (every message kind of
every hop, with its codec), pickling and the task side's ``__main__`` namespace, framing over Unix
sockets and the descriptor that watches many of them, pacing and batching, socket helpers, CurveZMQ
on sockets (keys, the authenticator: ``_curve``) and key files (``_security``, loaded only where keys
are used), endpoints, the error classes, and the host's features. Imports nothing of ours outside
itself.
"""
