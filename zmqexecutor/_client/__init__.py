"""The client process: what runs inside the user's program beside ``ZMQExecutor``.

The handle user threads call (``_handle``: tasks and requests in, snapshots out), the I/O thread's
loop (``_engine``) and its ``_settings``, the socket-free scheduler, what becomes of each task
(``_outcomes``), the fleet of workers (``_fleet``: one ``_connection`` per bound worker, the ``_dialin``
port for workers that dial in), the local worker it owns (``_local``, read by the engine like any other
source) and the direct lanes to that worker's task processes (``_direct``), and the caller path by
which a user thread sends and reads its own lone task (``_caller``). Imports ``_wire``, never ``_worker``.
"""
