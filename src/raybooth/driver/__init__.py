"""The driver: everything that decides and launches on Ray. It checks the settings and turns them into
one TrainPlan (plan), starts or attaches to Ray (cluster), hands the loop to Ray Train (launch,
preload) and the images to Ray Data (datasets, generation, local_generation), keeps Ray Train's run
folder (runs), and places the finished model (training)."""
