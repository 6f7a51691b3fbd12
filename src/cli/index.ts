import { main } from './main.ts';

// Exit explicitly: a command is done when main returns, even if a library left a timer or a
// socket behind. (stdout/stderr writes to pipes and files are synchronous on Linux.)
process.exit(await main(process.argv));
