"""Engines turn planned files into rows: ``process(files, job)`` on this machine (local) or on a
Ray cluster (ray_engine), both with the shared stage code in stages.py."""
