"""Making images with a loaded pipeline: the pipeline and its sampler (pipelines), images made on a
training worker with the modules it holds (on_worker), and how sample sets are named and shared out
(sample_plans). The Ray Data job that drives `raybooth generate` is the driver's
(driver/generation.py)."""
