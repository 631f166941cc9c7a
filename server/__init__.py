"""iserver: a pre-forking server that reads detector events and hands them
over through POSIX shared memory (or inline over TCP).

Runs on Python 3.9 with the standard library and numpy only; psana and h5py
are imported by their sources when those are used.
"""
