--- Progress of long loops: a bar redrawn in place on a terminal, plain periodic lines otherwise (logs,
--- pipes, CI), both with the rate and the estimated time left.
---   local bar = pmp.progress.new{ total = #items, label = 'eval', unit = 'items' }
---   for k, item in ipairs(items) do work(item); bar:update(k) end
---   bar:finish()
--- Options: total (nil: unknown, no percentage or ETA), label, unit ('B' prints sizes as KB/MB/GB),
--- stream (default io.stderr, so results on stdout stay clean), tty (default: whether the stream's file
--- descriptor is a terminal), interval (seconds between plain lines, default 10; a line is also printed
--- whenever another tenth of the total is done), clock (a function returning seconds, for tests).
local ffi = require 'ffi'
local clock = require 'pmp.clock'

pcall(ffi.cdef, 'int isatty(int fd);')

local M = {}

--- Seconds left at the average rate so far, or nil before anything is done.
function M.eta(done, total, elapsed)
  if not total or done <= 0 or elapsed <= 0 then return nil end
  return math.max(0, total - done) * elapsed / done
end

--- 75 -> '01:15', 3725 -> '1:02:05'.
function M.duration(seconds)
  if seconds == nil then return '--:--' end
  seconds = math.floor(seconds + 0.5)
  local h, m, s = math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60
  if h > 0 then return string.format('%d:%02d:%02d', h, m, s) end
  return string.format('%02d:%02d', m, s)
end

local function amount(value, unit)
  if unit ~= 'B' then
    local text = value == math.floor(value) and string.format('%d', value) or string.format('%.1f', value)
    return unit and unit ~= '' and (text .. ' ' .. unit) or text
  end
  local scaled, suffix = value, 'B'
  for _, s in ipairs({ 'KB', 'MB', 'GB', 'TB' }) do
    if scaled < 1000 then break end
    scaled, suffix = scaled / 1000, s
  end
  return suffix == 'B' and string.format('%d B', value) or string.format('%.1f %s', scaled, suffix)
end

local function rate_text(rate, unit)
  if unit == 'B' then return amount(rate, 'B') .. '/s' end
  return string.format('%.1f %s/s', rate, unit ~= '' and unit or 'it')
end

local Bar = {}
Bar.__index = Bar

function M.new(options)
  options = options or {}
  local stream = options.stream or io.stderr
  local tty = options.tty
  if tty == nil then
    local fd = stream == io.stdout and 1 or (stream == io.stderr and 2 or nil)
    tty = fd ~= nil and ffi.C.isatty(fd) == 1
  end
  local now = options.clock or clock.now
  local start = now()
  return setmetatable({
    total = options.total, label = options.label or 'progress', unit = options.unit or '', stream = stream, tty = tty,
    interval = options.interval or 10, now = now, start = start, last_line = start, last_decile = 0, done = 0,
    width = 0,
  }, Bar)
end

--- 'label: 45/100 items (45.0%), 12.3 items/s, ETA 00:04' (the counts in the bar's unit).
function Bar:status(detail)
  local elapsed = self.now() - self.start
  local parts = { amount(self.done, self.unit) }
  if self.total then
    parts[1] = string.format('%s/%s (%.1f%%)', amount(self.done, ''), amount(self.total, self.unit),
      self.total > 0 and 100 * self.done / self.total or 100)
  end
  local text = self.label .. ': ' .. parts[1]
  if elapsed > 0 then text = text .. ', ' .. rate_text(self.done / elapsed, self.unit) end
  if self.finished then
    text = text .. ', done in ' .. M.duration(elapsed)
  elseif self.total then
    text = text .. ', ETA ' .. M.duration(M.eta(self.done, self.total, elapsed))
  end
  if detail and detail ~= '' then text = text .. ' | ' .. detail end
  return text
end

function Bar:draw(detail)
  local text = self:status(detail)
  if self.total and self.total > 0 then
    local cells = 24
    local filled = math.min(cells, math.floor(cells * self.done / self.total))
    text = text:gsub(': ', ': [' .. string.rep('#', filled) .. string.rep('.', cells - filled) .. '] ', 1)
  end
  -- pad over the previous, possibly longer, text
  self.stream:write('\r' .. text .. string.rep(' ', math.max(0, self.width - #text)))
  self.width = #text
  self.stream:flush()
end

--- done: the count so far (absolute); detail: optional text appended to the line.
function Bar:update(done, detail)
  self.done = done
  local t = self.now()
  if self.tty then
    if t - self.last_line >= 0.1 then
      self.last_line = t
      self:draw(detail)
    end
    return
  end
  local decile = self.total and self.total > 0 and math.floor(10 * done / self.total) or 0
  if t - self.last_line >= self.interval or decile > self.last_decile then
    self.last_line, self.last_decile = t, math.max(decile, self.last_decile)
    if done < (self.total or math.huge) then self.stream:write(self:status(detail), '\n') end
  end
end

function Bar:advance(count, detail) self:update(self.done + (count or 1), detail) end

--- The final line, with the total time in place of the ETA.
function Bar:finish(detail)
  self.finished = true
  if self.tty then
    self:draw(detail)
    self.stream:write('\n')
  else
    self.stream:write(self:status(detail), '\n')
  end
  self.stream:flush()
end

return M
