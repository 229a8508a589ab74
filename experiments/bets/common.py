"""The users the small bets run on (files under the corpora folder, without .txt)."""
USERS = {"programmer": "programmer/cpython_asyncio", "novelist": "novelist/austen_pride_and_prejudice",
         "scientist": "scientist/arxiv_astro_ph"}
