"""Benchmark evaluation: running sequences in batches, result files, the field's metrics, reports.

* :mod:`lorat.evaluation.runner` -- many sequences advanced per forward pass, resumable.
* :mod:`lorat.evaluation.results` -- result files in the benchmarks' formats, submission zips.
* :mod:`lorat.evaluation.metrics` -- success, precision, normalised precision, GOT-10k AO / SR.
* :mod:`lorat.evaluation.report` -- tables, CSV and plots.
"""
