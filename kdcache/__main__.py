from kdcache.cli import main

main()
