"""Files and folders, with no model in sight: image folders and how photos are read (images), the
names and seeds of generated images (names), writes and moves that land whole or not at all
(writes), the lock that keeps two runs out of one output (lock), and checkpoint folders as the
driver sees them (checkpoints)."""
