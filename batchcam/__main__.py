from batchcam.cli import main

raise SystemExit(main())
