from worker.app.cli import main

main()
