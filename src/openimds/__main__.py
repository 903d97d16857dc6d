from openimds.cli import main

raise SystemExit(main())
