from cputune.cli import main

main()
