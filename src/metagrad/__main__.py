from metagrad.cli import main

raise SystemExit(main())
