from manidp.cli import run

run()
