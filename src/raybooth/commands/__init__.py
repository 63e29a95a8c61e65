"""The `raybooth` command (cli), `raybooth run`'s whole job in one go (run), and the picture and
numbers it ends with (outcome). The top layer: nothing imports it."""
