import os
import sys

# The scripts left in tools/ are not a package: their folder goes on the path to import them.
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools")
sys.path.insert(0, TOOLS)
