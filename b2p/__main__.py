from b2p.cli import app

app()
