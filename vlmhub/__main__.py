from vlmhub.cli import main

main()
