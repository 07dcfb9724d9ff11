from sparse_attention.cli import main

main()
