"""The evaluation cache: one SQLite row per evaluated config, safe to kill, resume and share.

One cache file holds the records of ONE evaluation signature (model, multiquantizer hash, prompts or
classes, seeds, steps, guidance, metric versions — whatever the evaluator puts in it). Opening it with
another signature raises :class:`SignatureMismatchError` naming what differs, before anything is
written, so records of two protocols are never mixed. Use one cache file per protocol.

Tables (``sqlite3 FILE .schema`` shows them)::

    meta(key, value)              format, signature, evaluation (JSON), layer_stats (JSON), created_at
    runs(run_id, signature, sampler, planned, created_at)
                                  a run = one sampler setting (seed, bits, methods, fixed layers);
                                  config i of a run is always the same config
    records(id, run_id, idx, signature, config_hash, config, avg_bits, quantized_bytes, summed_error,
            metrics, timings, host, created_at, checksum)      UNIQUE(signature, config_hash)
    run_configs(run_id, idx, record_id)                        PRIMARY KEY(run_id, idx)
    claims(run_id, idx, owner, expires)                        PRIMARY KEY(run_id, idx)

A record is written once per (signature, config hash): a sampler index whose config was already
evaluated (by another run, or an earlier index) is linked to the existing record in ``run_configs``
and not evaluated again. ``run_id``/``idx`` of a record are those of the run that first evaluated it
(null for configs evaluated outside a run). ``checksum`` (BLAKE2b of the record's content) lets
:meth:`ConfigCache.verify` find a damaged or hand-edited row.

Concurrency: WAL journal, ``synchronous=FULL``, every write in a ``BEGIN IMMEDIATE`` transaction, a
60 s busy timeout. Several processes on one machine may run jobs on one cache: each *claims* a
sampler index before evaluating it (``claims``); a claim of a dead process on this host is taken over
at once, a claim of another host when its lease expires (owners renew their leases while alive).
SQLite over a network file system is not safe: for many machines, use the Ray runner, whose driver is
the only writer.

A SIGKILL at any moment leaves either the committed record or nothing; a rerun evaluates what is missing.
"""

from __future__ import annotations

from ...config import config_hash, normalize_config
from .claims import process_owner
from .formats import from_reference_names, read_records_file, to_reference_name
from .records import (FORMAT, RECORD_FIELDS, REFERENCE_METRIC, SignatureMismatchError, build_record, describe_difference,
                      evaluation_signature, now_iso, run_id_for)
from .store import CHEAP, FULL, AddResult, ConfigCache
from .files import import_records, read_records, rebind_multiquantizer, remove_if_empty

__all__ = ["AddResult", "CHEAP", "ConfigCache", "FULL", "FORMAT", "RECORD_FIELDS", "REFERENCE_METRIC",
           "SignatureMismatchError", "build_record", "config_hash", "describe_difference",
           "evaluation_signature", "from_reference_names", "import_records", "normalize_config", "now_iso",
           "process_owner", "read_records", "read_records_file", "rebind_multiquantizer", "remove_if_empty",
           "run_id_for", "to_reference_name"]
