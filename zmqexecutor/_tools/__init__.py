"""The command line (``zmqexecutor worker|ssh|slurm|keygen|status|ping|drain``) and what it drives:
status queries and the SSH and Slurm launchers. Loaded only when used.
"""
