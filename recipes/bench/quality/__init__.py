"""Quality: validation perplexity of every method as the token budget grows, on the real corpus.

A small LLaMA (``llama_20m`` shapes: d = 256, 4 layers; 7.4M parameters with the 8k tokenizer trained on
the corpus) is trained by ``recipes/pretrain.py`` with each method at several budgets (``--budgets``,
default 1M, 2M and 4M tokens: the goal asks for at least 4M, and 8M does not fit the time of the shared
2-core machine). The plan is a sequence of stages, each decided by the results of the ones before it
(:func:`.plan.stages`):

1. **sweep** (the shortest budget, seed 0): every method at each rate of its grid (:data:`.plan.GRIDS`), the
   middle rates of all methods first; where the best rate sits on the edge of the grid, the grid is
   extended by one more factor of 2 (at most ``--max-extensions`` times);
2. **full-rank tuning** (same budget, seed 0): from its best single rate, the split between the
   embeddings/head and the decoder's linear weights (``--linear-lr-scale``), then the warmup, then the
   std of the decoder's linear weights at init (``--linear-init-std``) -- each knob at the
   best setting of the ones before it, so full-rank is tuned on more knobs than any other method;
3. **each longer budget**, shortest first: every method at its best configuration of the sweep, seed 0
   (and full-rank at its best *single* rate too, as "full, one lr": what the tuning buys at each budget);
4. **the longest budget**: every method's rate re-checked at x0.5 and x2, then the best of the three
   again with seeds 1 .. ``--seeds``-1.

Each run is a fresh ``pretrain.py`` process (its own peak memory) in ``--out/<run name>`` (untracked:
checkpoints, metrics). When a run finishes, a small **result file** is written to
``--results/<run name>.json`` (default ``docs/benchmarks/quality/``: its configuration, initial and
final validation loss and perplexity, the evaluation curve, parameters, peak memory, tokens/s), and with
``--commit-results`` it is committed at once (that file only). A run whose result file exists is never run
again, even on a fresh clone with no ``runs/``; an interrupted run resumes from its last checkpoint. The
report (tables, targets, the ratio plot) is built from the result files alone, so ``--report-only`` works
anywhere the repository is checked out, and goes into docs/benchmarks.md and docs/benchmarks/.

    nohup nice -n 19 python -m recipes.bench.quality --jobs 1 --commit-results \\
        --data-files 'corpus/train/*.txt' --valid-files 'corpus/valid/*.txt' > /tmp/quality-study.log 2>&1 &
    python -m recipes.bench.quality --report-only        # the report from the result files so far
    python -m recipes.bench.quality --plan               # the runs the next stage needs, from the results so far
    python -m recipes.bench.quality --quick --no-write --data-files ... --valid-files ...   # a smoke test
    python -m recipes.bench.quality.step_size --data-files ... --valid-files ...   # the step sizes (below)

``--data-files`` and ``--valid-files`` (text-file globs) are required except with ``--report-only`` and
``--plan``: the study ships no corpus.

The modules: ``plan`` (the runs, the stages, what is left), ``results`` (the result files), ``execute``
(training the runs), ``report`` (the tables), ``plots`` (the figures), ``cli`` (the command line), and two
that ask why the methods rank as they do: ``init_scale`` (how large each method's layers start) and
``step_size`` (how far one step at each configuration's rate moves each part of the model; it replays the
first steps of finished runs and writes ``why/step_size.json`` beside the result files).
"""
