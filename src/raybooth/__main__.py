from raybooth.commands.cli import run

run()
