from rgchat.cli import main

main()
