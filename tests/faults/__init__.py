"""Fault-injection scenarios against a PostgreSQL cluster of their own.

``scenarios`` holds each scenario as a function of its size; the tests here run
them small (bounded, part of ``python -m pytest``), ``bench/faults.py`` runs
them at full size. Every scenario ends in ``invariants.check``.
"""
