from r2m.cli import main

main()
