from gen_cli.cli import main

main()
