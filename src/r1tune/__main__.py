from r1tune.cli import main

raise SystemExit(main())
