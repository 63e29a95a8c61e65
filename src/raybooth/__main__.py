from raybooth.cli import main

raise SystemExit(main())
