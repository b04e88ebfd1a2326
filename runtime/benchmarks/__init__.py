"""The measurement code of ``cxr-infer bench`` (docs/bench.md): accuracy, latency and throughput of
one or more models on labelled folders, by source (``benchmark``, which the command calls), the
input check's flag rates and AUROC on folders that are not chest X-rays (``inputcheck_bench``), and
the realised triage rates against the validation rates (``triage_bench``). Loaded only when
``bench`` runs, so ``cxr-infer --help`` never imports it.
"""
