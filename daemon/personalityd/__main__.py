from personalityd.daemon import main

raise SystemExit(main())
