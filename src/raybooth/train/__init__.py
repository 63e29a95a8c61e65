"""The training worker: the loop each Ray Train worker runs (loop: set up, train, save), what it reads
(plan, data, batches, crop_latents), the step (loss, precision, step, graphs, optim, masters,
parallel), and what it keeps (losslog, checkpoints, checkpoint_writer, finish). Nothing here
decides for the cluster; the driver hands it a TrainPlan."""
