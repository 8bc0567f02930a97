from megacore.cli import run

run()
