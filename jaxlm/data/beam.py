"""The same preparation as an Apache Beam pipeline: one element per unit of work, each worker
writing that unit's shards exactly as ``Preparation.prepare_unit`` does locally (so the shards are
byte-identical to a local run's), then the index written here.

Run it on any Beam runner by passing pipeline options (``--runner=DataflowRunner --project=...``,
``--runner=FlinkRunner``, ...); the default is the DirectRunner in this process. The input files
and the tokens directory must be paths every worker can open (a shared or mounted file system:
NFS, Filestore, gcsfuse), as they are for the processes of a multi-host training run.
"""

from __future__ import annotations

from pathlib import Path

from jaxlm.data.prepare import Preparation, try_lock


def prepare_with_beam(source, tokenizer, out, pipeline_args=(), *, log=None, chunk_bytes=None) -> dict:
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ValueError("--beam needs Apache Beam: pip install 'jaxlm[beam]'") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep = Preparation(source, tokenizer, out, chunk_bytes=chunk_bytes)
    if prep.complete():
        return prep.run()
    todo = [k for k in range(len(prep.units)) if not prep.done(k)]
    if log is not None:
        log(f"preparing {source.label or source.root} with Apache Beam: {len(todo)} of {len(prep.units)} units "
            f"-> {out} ({' '.join(pipeline_args) or 'DirectRunner'})")
    args = list(pipeline_args)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=ERROR")  # workers' INFO lines drown the progress
    try:
        options = PipelineOptions(args)
    except SystemExit:  # Beam's own argparse: its message is already printed
        raise ValueError(f"bad Beam pipeline options: {' '.join(pipeline_args)}") from None
    with beam.Pipeline(options=options) as p:
        (p | "units" >> beam.Create(todo)
           | "spread" >> beam.Reshuffle()
           | "tokenize" >> beam.ParDo(_PrepareUnit(source, tokenizer, str(out), chunk_bytes)))
    return prep.run(log)  # every unit is complete: writes the index


try:
    import apache_beam as _beam

    class _PrepareUnit(_beam.DoFn):
        def __init__(self, source, tokenizer, out, chunk_bytes):
            self.args = (source, tokenizer, out, chunk_bytes)

        def setup(self):
            source, tokenizer, out, chunk_bytes = self.args
            self.prep = Preparation(source, tokenizer, out, chunk_bytes=chunk_bytes)

        def process(self, k):
            with try_lock(self.prep.out / f".unit-{k:05d}.lock", True):
                if not self.prep.done(k):
                    self.prep.prepare_unit(k)
            yield k
except ImportError:  # without the beam extra, prepare_with_beam says how to get it
    _PrepareUnit = None
