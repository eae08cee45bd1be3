import sys

from student_clap.cli import main

sys.exit(main())
