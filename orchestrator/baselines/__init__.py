"""External baselines the benchmark runs beside ccdni's own schedules.

:mod:`orchestrator.baselines.torch_pipeline` trains the same chunks with PyTorch's
own pipeline runtime (``torch.distributed.pipelining``), one process per chunk.
"""
