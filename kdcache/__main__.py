from kdcache.cli.commands import main

main()
