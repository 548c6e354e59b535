import sys

from t2i.data.convert import main

sys.exit(main())
