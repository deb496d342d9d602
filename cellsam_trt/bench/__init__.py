"""The measuring core of the benchmarks (``cellsam-trt bench`` and the repository's bench/
scripts): what they time, on which machine, written as JSON.

- ``timing``: device clocks, a backend that times its graph calls, sample summaries, rows
  that may fail (out of memory) without ending a run;
- ``measure``: one ``segment`` call and the released per-box loop stage by stage, the
  preprocessing steps, the mask painter;
- ``options``: ``BenchOptions``, also the command's options;
- ``latency``: the ``cellsam-trt bench`` run and its JSON report;
- ``machine``: CPU, GPU and library versions of a report.

Markdown tables and plots of the reports are made in the repository's bench/ folder
(bench/report.py), not by the installed package.
"""
