from exemplar.cli import main

raise SystemExit(main())
