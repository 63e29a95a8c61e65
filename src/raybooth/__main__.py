from raybooth.cli import run

run()
